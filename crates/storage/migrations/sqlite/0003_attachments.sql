-- The text of a file attached to a question, as the model saw it.
ALTER TABLE messages ADD COLUMN attachment_text TEXT;
