"""The stages of a LUSS run, one module per stage."""
