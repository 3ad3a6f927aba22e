"""Scripts to look inside a model or move its weights, each run as `python tools/<name>.py --key=value`:
evaluate (loss, perplexity, surprisal), attention (attention maps), plot (loss curves), sizing (memory and time
before a run), export_hf (a checkpoint as a Hugging Face directory)."""
