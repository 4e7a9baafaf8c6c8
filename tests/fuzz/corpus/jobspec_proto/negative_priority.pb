
/srv/models/llama!
/srv/data/train.jsonlmessagesPÿÿÿÿÿÿÿÿÿ