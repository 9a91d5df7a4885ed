"""Architecture search: candidates for a budget, each pruned and briefly distilled, the best kept."""
