"""What the client sent, as one request model: JSON generations, multipart edits and variations."""
