"""Interoperability: SAELens / TransformerLens export and import."""
