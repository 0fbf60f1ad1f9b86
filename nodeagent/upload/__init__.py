"""Upload: chunking, the per-member plan, the page stream to the coordinator."""
