"""Forest dataset tools: layout reader/writer, synthetic generator, curation (forest-dataset CLI)."""
