"""Training stage: data sets and transforms, architectures, the one training loop, and the network
families built on it (KD students, Born-Again and Knowledge-Evolution generations, compressed copies)."""
