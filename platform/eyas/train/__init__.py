"""EAGLE-3 head training on Ray Train: TTT loss, AdamW + cosine, checkpoints, resume, export.

Public API (heavy imports stay inside the functions)::

    eyas.train.config.TrainJobConfig / TrainConfig      the job's configuration
    eyas.train.trainer.run_training(cfg, datasets=None)  train + export + manifest (driver side);
                                                         ``datasets={"train": ray.data.Dataset}`` is
                                                         the seam for any source of feature rows
    eyas.train.loop.train_loop_per_worker(spec_dict)     the Ray Train worker loop (TTTModule inside)
    eyas.train.data.feature_datasets / feature_spec      features stage -> datasets, target, layers
    eyas.train.checkpoint.save_checkpoint / load_checkpoint   pickle-free checkpoint directories
    eyas.train.resume.resume_dir / restore               where a (re)started worker resumes from
    eyas.train.export.export_draft                       checked draft directory at a URI
"""
