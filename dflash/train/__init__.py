"""Training DFlash drafters: regenerate responses with the target (`dflash data`) and train a
drafter on them (`dflash train`). See dflash/train/trainer.py for the launch commands."""
