
/srv/models/llama!
/srv/data/train.jsonlmessagesPXb
teamnlp