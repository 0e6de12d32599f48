"""Training stage: data sets, architectures, the one training loop, network families."""
