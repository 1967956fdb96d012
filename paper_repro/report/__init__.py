"""Tables and figures, rendered from the results store only (`paper_repro.results.load`)."""
