"""The `vistralv-ray` command line: one module per group of sub-commands, registered in main."""
