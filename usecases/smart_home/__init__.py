"""Smart-home use case: privacy-preserving occupancy counting from a low-resolution thermal sensor."""
