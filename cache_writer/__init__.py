"""SAE activation-cache pipeline."""
