"""Preprocessing fitted on the training split and applied clip by clip to every split: target
lengths and the model-ready sequences (`sequences`), feature scaling and the data profile
(`scaling`), early fusion's frame alignment (`align`)."""
