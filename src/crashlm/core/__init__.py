"""Building blocks: errors, files, models, the one encoding of a (context, answer) pair, tasks, assets."""
