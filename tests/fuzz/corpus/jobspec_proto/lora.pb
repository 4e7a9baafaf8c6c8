
/srv/models/llama!
/srv/data/train.jsonlmessages"Jout