"""DWM inside other libraries' training loops (dwm.DWM underneath): hf.py, the transformers Trainer."""
