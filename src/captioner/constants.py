"""Names shared by training, export, the pipeline and the gateway.

Everything that must agree across a process boundary (special tokens, signature
and tensor names, artifact file names) is defined once here.
"""

PAD = "<pad>"
START = "<start>"
END = "<end>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

# SavedModel signatures and their tensor names.
SERVE_TAG = "serve"
SIG_SERVING = "serving_default"
SIG_ENCODE = "encode"
SIG_DECODE_STEP = "decode_step"
SIG_METADATA = "metadata"
IN_IMAGE_BYTES = "image_bytes"
IN_BEAM_SIZE = "beam_size"
IN_MAX_LENGTH = "max_length"
IN_IMAGES = "images"
IN_FEATURES = "features"
IN_TOKENS = "tokens"
IN_STATE = "state"
IN_POSITION = "position"
IN_ROWS = "rows"  # metadata: one answer per row, so TF Serving can batch it
OUT_CAPTIONS = "captions"
OUT_SCORES = "scores"
OUT_TOKENS = "tokens"
OUT_NBEST = "nbest_captions"
OUT_NBEST_SCORES = "nbest_scores"
OUT_FINISHED = "finished"
OUT_NBEST_FINISHED = "nbest_finished"
OUT_ATTENTION = "attention"
OUT_FEATURES = "features"
OUT_LOG_PROBS = "log_probs"
OUT_STATE = "state"
OUT_METADATA = "metadata_json"
OUT_VOCAB = "vocab"

# Artifact file names.
VOCAB_JSON = "vocab.json"
VOCAB_TXT = "vocab.txt"
RUN_SUMMARY = "run_summary.json"
METRICS_CSV = "metrics.csv"
CONFIG_SNAPSHOT = "config_snapshot.json"
EVALUATION_JSON = "evaluation.json"
SAMPLES_JSON = "samples.json"
SAVED_MODEL_DIR = "saved_model"
CHECKPOINT_DIR = "checkpoints"
# A run with ensemble.members trains member i into <run>/members/member-<i>, a run folder of its own.
MEMBERS_DIR = "members"
LOG_DIR = "logs"
METADATA_JSON = "metadata.json"
WARMUP_FILE = "tf_serving_warmup_requests"
FEATURES_INDEX = "index.json"
COMPLETE_MARKER = "_COMPLETE"

# Decoding limits a caller may ask for, shared by `captioner caption` and the gateway so both accept
# the same values. Beam search cost grows with the beam and captions stop improving well before 10.
# The longest caption is bounded by the export's fixed-size decode state (export.max_decode_length,
# default 40): asking a default export for more would only fail inside the graph, so the shared cap
# is that default; a model exported with a smaller state refuses longer requests with a clear error.
MIN_BEAM_SIZE = 1
MAX_BEAM_SIZE = 10
MIN_CAPTION_LENGTH = 2
MAX_CAPTION_LENGTH = 40
