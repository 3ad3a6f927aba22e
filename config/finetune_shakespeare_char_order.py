# A classifier fine-tuned from the encoder of config/train_shakespeare_char_bert.py: is a line of Shakespeare as
# written, or are its words shuffled? (prepare/shakespeare_char_order.py; its validation lines come from text neither
# model ever trains on). The encoder's MLM head gives way to a new head on [CLS] (engine/classify.py).
# Hardware: 2 CPU cores. Expected: held-out accuracy ~0.9 after 600 iterations, about a minute.
# Data: python prepare/shakespeare_char.py && python prepare/shakespeare_char_order.py
# First: python train.py config/train_shakespeare_char_bert.py

out_dir = "out-shakespeare-char-order"
init_from = "out-shakespeare-char-bert"
eval_interval = 200
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char_order"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64  # the encoder's: 90% of the lines fit whole ([CLS] and [SEP] included)

arch = "encoder"
dropout = 0.1  # fine-tuning a small labelled set: BERT's dropout

learning_rate = 3e-4
max_iters = 600
lr_decay_iters = 600
min_lr = 3e-5
beta2 = 0.99
warmup_iters = 30

compile = False
