"""The example configs, shipped with the package: ``ringflow run -c smoke`` finds them by name."""
