"""The SFT data pipeline: loading, chat-template tokenization and label masking, step planning, collation."""
