"""synthport mappings package (see DESIGN.md layout)."""
