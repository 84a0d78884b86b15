"""mie.shards: offline corpus work, corpora → WebDataset shard sets and their enrichment."""
