"""The language model: the transformer, its generation, its training job."""
