package fhirgate.hapi;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.MemoryBinaryStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.partition.PartitionManagementProvider;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.partition.RequestTenantPartitionInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.tenant.UrlBaseTenantIdentificationStrategy;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.util.Properties;
import javax.sql.DataSource;

/**
 * The HAPI FHIR JPA server of fhirgate's end-to-end tests: HAPI's own Spring configuration (the
 * modules the hapiproject/hapi image is built from) on an in-memory H2 database, R4, with
 * URL-based partitioning so that each test gets a partition of its own.
 *
 * Differences from the image's defaults, on purpose: search results are not reused across
 * requests (a search right after a write sees it), multiple delete and expunge are on, references
 * are not checked on write (fixtures point outside their case), batch jobs advance every second
 * instead of every minute. Partitions are database partitions (HAPI 8's mode for new
 * installations): each has its own id space, so two tenants may both hold Patient/p1.
 */
@Configuration
@Import({JpaR4Config.class, HapiJpaConfig.class, JpaBatch2Config.class, Batch2JobsConfig.class, ThreadPoolFactoryConfig.class,
		SubscriptionChannelConfig.class})
public class HapiConfig {
	/** URL-based partitioning (/fhir/{partition}/...) unless HAPI_PARTITIONING=false. */
	static final boolean PARTITIONING =
			!"false".equalsIgnoreCase(System.getenv().getOrDefault("HAPI_PARTITIONING", "true"));

	@Bean
	public DataSource dataSource() {
		BasicDataSource ds = new BasicDataSource();
		ds.setDriverClassName("org.h2.Driver");
		ds.setUrl("jdbc:h2:mem:hapi;DB_CLOSE_DELAY=-1");
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(10);
		return ds;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory, FhirContext fhirContext, JpaStorageSettings settings) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, settings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource());
		Properties p = new Properties();
		p.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		p.put("hibernate.hbm2ddl.auto", "update");
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.search.enabled", "false");
		p.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		emf.setJpaProperties(p);
		return emf;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory emf) {
		return new JpaTransactionManager(emf);
	}

	@Bean
	public JpaStorageSettings jpaStorageSettings() {
		JpaStorageSettings s = new JpaStorageSettings();
		s.setAllowExternalReferences(true);
		s.setAllowContainsSearches(true); // the hapiproject/hapi image's default (allow_contains_searches)
		s.setAllowMultipleDelete(true);
		// The policy corpus' fixtures point at resources outside each case (a Patient's
		// Organization/org1): the image's enforce_referential_integrity_on_write=false.
		s.setEnforceReferentialIntegrityOnWrite(false);
		s.setExpungeEnabled(true);
		s.setDeleteExpungeEnabled(true);
		s.setReuseCachedSearchResultsForMillis(null); // every search hits the DB (no 60 s result cache)
		return s;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		PartitionSettings p = new PartitionSettings();
		p.setPartitioningEnabled(PARTITIONING);
		p.setDatabasePartitionMode(PARTITIONING);
		return p;
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new MemoryBinaryStorageSvcImpl();
	}

	/** Batch2 jobs (DELETE ?_expunge=true, $reindex, ...) advance one step per maintenance pass: default 60 s. */
	@Bean
	public String fastBatch2Maintenance(IJobMaintenanceService maintenance) {
		((JobMaintenanceServiceImpl) maintenance).setScheduledJobFrequencyMillis(
				Long.parseLong(System.getenv().getOrDefault("HAPI_BATCH2_INTERVAL_MS", "1000")));
		return "batch2-maintenance-interval-set";
	}

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			PartitionManagementProvider partitionManagementProvider,
			RequestTenantPartitionInterceptor tenantInterceptor) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		JpaCapabilityStatementProvider cs = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		cs.setImplementationDescription("HAPI FHIR R4 Server");
		server.setServerConformanceProvider(cs);
		pagingProvider.setDefaultPageSize(20); // same defaults as the hapiproject/hapi image
		pagingProvider.setMaximumPageSize(Integer.MAX_VALUE);
		server.setPagingProvider(pagingProvider);
		server.setDefaultPrettyPrint(false);
		if (PARTITIONING) {
			server.registerInterceptor(tenantInterceptor);
			server.setTenantIdentificationStrategy(new UrlBaseTenantIdentificationStrategy());
			server.registerProvider(partitionManagementProvider);
		}
		return server;
	}
}
