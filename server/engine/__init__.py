"""The one owner of the model: requests in, generated text out."""
