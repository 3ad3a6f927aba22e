# Evaluate OpenAI's GPT-2 (774M; n_layer=36, n_head=20, n_embd=1280) on OpenWebText, then exit.
# Hardware: one GPU, a few minutes. Expected: train and val loss ~2.66 (nanoGPT's measurement).
# Needs the weights from the Hugging Face hub (or --init_from=<local HF directory>) and python prepare/openwebtext.py.
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = "gpt2-large"
