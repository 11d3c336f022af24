"""Networks: classifiers (digits CNN, CIFAR ResNets, timm) and their loading."""
