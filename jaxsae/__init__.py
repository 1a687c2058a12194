"""jaxsae: sparse autoencoders on transformers trained on formal languages."""
