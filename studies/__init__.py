"""Whole studies: the study file, the stage cache and the runner that drives every stage; the
shipped study files (``*.yaml``) sit beside them."""
