"""RECIPE: retrieval-augmented continuous prompts (Chen et al. 2024), as an editstream method."""
