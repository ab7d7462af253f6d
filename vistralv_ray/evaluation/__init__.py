"""Vietnamese vision-language benchmarks: loaders, official metrics, bootstrap intervals and comparisons."""
