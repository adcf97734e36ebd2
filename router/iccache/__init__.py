"""IC-Cache: past large-model answers as in-context examples for a small model, and a learned
router between the two (Yu et al., SOSP 2025). Never an answer served from the cache."""
