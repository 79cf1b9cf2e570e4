"""The HTTP layer of the model service (FastAPI): routes over pipeline.serving, no model logic here."""
