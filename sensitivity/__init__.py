"""The framework core: augmentations, problems, designs, estimators, the engine, results files,
masking and statistics (docs/ARCHITECTURE.md "Layout"). It imports torch, numpy, scipy, h5py,
matplotlib and scikit-learn, never Lightning, wandb or the command line."""
