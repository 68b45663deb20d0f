"""Data sets and input pipelines: the embedded digits, image folders, ImageNet and CIFAR (:mod:`~toe.data.datasets`),
the on-tensor batch augmentation (:mod:`~toe.data.augment`), EfficientTrain's curriculum
(:mod:`~toe.data.curriculum`) and LV-ViT's token labels (:mod:`~toe.data.token_label`, :mod:`~toe.data.label_maps`).
"""
