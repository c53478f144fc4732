"""Layer analyses: CKA similarity, logit and tuned lens, divergence, loss landscapes."""
