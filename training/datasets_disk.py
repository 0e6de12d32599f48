"""On-disk data set layouts (CUB-200, Flower102, Dogs, ImageFolder, CIFAR, Aircraft, VOC animals, Mix-320).

Each builder registers itself in :data:`training.data.DATASETS` on import.
"""
