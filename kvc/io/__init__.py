"""File formats: the capture and compressed safetensors files, atomic writes."""
