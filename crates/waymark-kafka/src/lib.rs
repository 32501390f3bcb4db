//! Kafka edge: the rdkafka log and the Kafka-protocol front door of waymark dev
