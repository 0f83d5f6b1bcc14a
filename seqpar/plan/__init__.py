"""`seqpar plan`: how much memory a run needs per rank, and the longest sequence that fits."""
