"""The language model: the transformer, its generation, its training recipe and job, loading."""
