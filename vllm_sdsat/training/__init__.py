"""Fine-tuning with adaptive tokens: the span layout and masks (`data`), the trainer and its
self-distillation (`train`), and held-out evaluation (`evaluate`)."""
