"""Preprocessing fitted on the training split and applied clip by clip to every split: target
lengths and the model-ready sequences (`sequences`), feature scaling (`scaling`), the data
profile and the scaler ``preprocess.scaling=auto`` picks from it (`profile`), early fusion's frame
alignment (`align`)."""
