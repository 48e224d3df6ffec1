"""Networks (U-Net 2D/3D, ResNet U-Net), building one from its config, loading pretrained weights, losses."""
