"""One LightningModule per distillation method, on the small shared base in base.py."""
