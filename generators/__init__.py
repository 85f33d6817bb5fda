"""synthport generators package (see DESIGN.md layout)."""
