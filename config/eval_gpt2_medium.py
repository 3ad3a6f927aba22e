# Evaluate OpenAI's GPT-2 (350M; n_layer=24, n_head=16, n_embd=1024) on OpenWebText, then exit.
# Hardware: one GPU, a few minutes. Expected: train and val loss ~2.85 (nanoGPT's measurement).
# Needs the weights from the Hugging Face hub (or --init_from=<local HF directory>) and python prepare/openwebtext.py.
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = "gpt2-medium"
