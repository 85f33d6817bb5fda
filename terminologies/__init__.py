"""synthport terminologies package (see DESIGN.md layout)."""
