"""Offline acceptance of a draft head on held-out features, side by side with n-gram drafting.

    eyas.evaluate.acceptance   pure tensor functions: chain_drafts, walk_acceptance, ngram_proposer
    eyas.evaluate.runner       run_evaluation(cfg, dataset=None) -> report (Ray Data actors)
"""
